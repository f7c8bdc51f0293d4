//! The volume API (create, revert, delete, the queries, XML, check) against
//! real `qemu-img` images, for every kind of snapshot:
//!
//! | module            | kind     | image  | filesystem          |
//! |-------------------|----------|--------|---------------------|
//! | `internal_qcow2`  | internal | qcow2  | /var/tmp            |
//! | `external_qcow2`  | external | qcow2  | /var/tmp            |
//! | `external_raw`    | external | raw    | /var/tmp            |
//! | `reflink_qcow2`   | reflink  | qcow2  | btrfs on a loop dev |
//! | `reflink_raw`     | reflink  | raw    | btrfs on a loop dev |
//! | `copy_qcow2`      | copy     | qcow2  | /var/tmp            |
//! | `copy_raw`        | copy     | raw    | /var/tmp            |
//!
//! Every test of a module is one behaviour of the API, asserted for that
//! kind; `vol_check` must report no violation after every successful
//! operation. Needs root (loop mounts), `qemu-img`, `qemu-io`, `mkfs.btrfs`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vsnap_engine::{
    xml, CreateRequest, DeleteRequest, Engine, EngineError, Format, RevertRequest, SnapKind,
    VolSnapFlags, VolSnapshot,
};
use vsnap_steps::qemu_img;

const MIB: u64 = 1 << 20;
/// Virtual size of every test image.
const SIZE: u64 = 4 * MIB;
/// Data is written in slots of `LEN` bytes, one slot per phase of a test.
const SLOT: u64 = 512 * 1024;
const LEN: u64 = 64 * 1024;

// ---------------------------------------------------------------- fixtures

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vsnap-volume-api-")
        .tempdir_in("/var/tmp")
        .expect("a temporary directory under /var/tmp")
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 256 MiB btrfs loop-mounted at `mnt`; unmounted on drop.
struct Btrfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Btrfs {
    fn new() -> Btrfs {
        let dir = tmpdir();
        let img = dir.path().join("btrfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let img_s = img.to_str().unwrap();
        run("truncate", &["-s", "256M", img_s]);
        run("mkfs.btrfs", &["-q", "-f", img_s]);
        run("mount", &["-o", "loop", img_s, mnt.to_str().unwrap()]);
        Btrfs { mnt, _dir: dir }
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// One kind of snapshot on one format of image.
#[derive(Clone, Copy, Debug)]
struct Case {
    kind: SnapKind,
    format: Format,
    btrfs: bool,
}

impl Case {
    fn file_based(self) -> bool {
        self.kind != SnapKind::Internal
    }
    fn ext(self) -> &'static str {
        match self.format {
            Format::Qcow2 => "qcow2",
            Format::Raw => "img",
        }
    }
    /// A kind of another family, for the kind filter of the queries.
    fn other_family(self) -> SnapKind {
        match self.kind {
            SnapKind::Internal => SnapKind::External,
            _ => SnapKind::Internal,
        }
    }
}

/// An engine on a fresh state directory and one image, `disk.<ext>`, in
/// `work` (on btrfs for reflink cases).
struct Fx {
    // Field order is drop order: the engine first, then the mount.
    engine: Engine,
    case: Case,
    work: PathBuf,
    image: PathBuf,
    _btrfs: Option<Btrfs>,
    _tmp: tempfile::TempDir,
}

impl Fx {
    fn new(case: Case) -> Fx {
        let tmp = tmpdir();
        let btrfs = case.btrfs.then(Btrfs::new);
        let work = match &btrfs {
            Some(b) => b.mnt.join("vm"),
            None => tmp.path().join("vm"),
        };
        std::fs::create_dir(&work).unwrap();
        let work = std::fs::canonicalize(&work).unwrap();
        let image = work.join(format!("disk.{}", case.ext()));
        qemu_img::create(&image, case.format, SIZE).expect("qemu-img create");
        let (engine, reports) = Engine::open(&tmp.path().join("state")).expect("Engine::open");
        assert!(
            reports.is_empty(),
            "a fresh state directory has nothing to recover: {reports:?}"
        );
        Fx {
            engine,
            case,
            work,
            image,
            _btrfs: btrfs,
            _tmp: tmp,
        }
    }

    fn req(&self, name: &str) -> CreateRequest {
        CreateRequest {
            image: self.image.clone(),
            name: Some(name.into()),
            kind: Some(self.case.kind),
            ..Default::default()
        }
    }

    /// Create snapshot `name` of this case's kind; checks the volume after.
    fn create(&self, name: &str) -> VolSnapshot {
        self.create_req(&self.req(name))
    }

    fn create_req(&self, req: &CreateRequest) -> VolSnapshot {
        let d = self
            .engine
            .vol_snapshot_create(req, false)
            .unwrap_or_else(|e| panic!("create {:?} ({:?}): {e}", req.name, self.case));
        assert!(d.plan.is_some() && !d.dry_run);
        self.check();
        d.snapshot
    }

    fn revert(&self, name: &str) {
        self.engine
            .vol_snapshot_revert(
                &RevertRequest {
                    image: self.image.clone(),
                    name: name.into(),
                },
                false,
            )
            .unwrap_or_else(|e| panic!("revert to {name} ({:?}): {e}", self.case));
        self.check();
    }

    fn delete(&self, name: &str, children: bool) -> vsnap_engine::Done {
        let d = self
            .engine
            .vol_snapshot_delete(
                &DeleteRequest {
                    image: self.image.clone(),
                    name: name.into(),
                    children,
                },
                false,
            )
            .unwrap_or_else(|e| {
                panic!("delete {name} (children: {children}, {:?}): {e}", self.case)
            });
        self.check();
        d
    }

    /// `vol_check` reports no violation.
    fn check(&self) {
        let r = self.engine.vol_check(&self.image).expect("vol_check");
        assert!(
            r.violations.is_empty(),
            "vol_check of {} ({:?}): {:#?}",
            self.image.display(),
            self.case,
            r.violations
        );
        assert_eq!(r.unfinished_plans, 0);
    }

    fn write(&self, slot: u64, pattern: u8) {
        write(&self.image, slot, pattern);
    }

    fn reads(&self, slot: u64, pattern: u8) -> bool {
        reads(&self.image, slot, pattern)
    }

    fn snap(&self, name: &str) -> VolSnapshot {
        self.engine
            .vol_snapshot_lookup_by_name(&self.image, name)
            .unwrap_or_else(|e| panic!("lookup {name}: {e}"))
    }

    fn names(&self) -> Vec<String> {
        self.engine
            .vol_snapshot_list_names(&self.image, None)
            .unwrap()
    }

    fn current(&self) -> Option<String> {
        self.engine
            .vol_snapshot_current(&self.image)
            .unwrap()
            .map(|s| s.name)
    }

    /// Internal snapshot names inside the image (qcow2).
    fn internal_names(&self) -> Vec<String> {
        qemu_img::info(
            &self.image,
            qemu_img::detect_format(&self.image).unwrap(),
            true,
        )
        .unwrap()
        .snapshots
    }

    fn default_file(&self, name: &str) -> PathBuf {
        self.work.join(format!("disk.{name}.{}", self.case.ext()))
    }

    /// Everything an operation could change: the catalog (snapshots,
    /// current), the journal's plans, and every file under the work
    /// directory (name, size, mtime, content hash).
    fn world(&self) -> World {
        World {
            snaps: self.engine.vol_snapshot_list(&self.image, None).unwrap(),
            current: self.current(),
            plans: self.engine.plans().unwrap().len(),
            files: tree_state(&self.work),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct World {
    snaps: Vec<VolSnapshot>,
    current: Option<String>,
    plans: usize,
    files: BTreeMap<PathBuf, FileState>,
}

#[derive(Debug, PartialEq, Eq)]
struct FileState {
    size: u64,
    mtime_ns: i128,
    hash: u64,
}

fn hash_file(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .hash(&mut h);
    h.finish()
}

/// Every file under `dir` (recursively, hidden files included).
fn tree_state(dir: &Path) -> BTreeMap<PathBuf, FileState> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.push(p);
            } else {
                let mtime_ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
                out.insert(
                    p.clone(),
                    FileState {
                        size: m.len(),
                        mtime_ns,
                        // A symlink (vsnap's ownership claim) by its target.
                        hash: if m.file_type().is_symlink() {
                            use std::hash::{Hash, Hasher};
                            let mut h = std::collections::hash_map::DefaultHasher::new();
                            std::fs::read_link(&p).unwrap().hash(&mut h);
                            h.finish()
                        } else {
                            hash_file(&p)
                        },
                    },
                );
            }
        }
    }
    out
}

/// Write `LEN` bytes of `pattern` at slot `slot` of the image at `path`
/// (its format read from its header: an external snapshot of a raw image
/// turns the path into a qcow2 overlay).
fn write(path: &Path, slot: u64, pattern: u8) {
    let fmt = qemu_img::detect_format(path).unwrap();
    qemu_img::io_write_pattern(path, fmt, slot * SLOT, LEN, pattern)
        .unwrap_or_else(|e| panic!("qemu-io write {}: {e}", path.display()));
}

/// Whether slot `slot` of the image at `path` (through its backing chain)
/// holds `pattern`.
fn reads(path: &Path, slot: u64, pattern: u8) -> bool {
    let fmt = qemu_img::detect_format(path).unwrap();
    qemu_img::io_read_pattern(path, fmt, slot * SLOT, LEN, pattern)
        .unwrap_or_else(|e| panic!("qemu-io read {}: {e}", path.display()))
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
}

/// The backing file `qemu-img info` names for `path`.
fn backing_of(path: &Path) -> Option<PathBuf> {
    let fmt = qemu_img::detect_format(path).unwrap();
    qemu_img::info(path, fmt, true)
        .unwrap()
        .backing
        .map(|b| canon(&b))
}

// ------------------------------------------------------- per-kind behaviours

/// Data written before the snapshot is in it: write A, snapshot, overwrite
/// with B, revert, read A. File-based snapshots hold A in their own file.
fn create_holds_data_written_before(c: Case) {
    let fx = Fx::new(c);
    fx.write(0, 0xa1);
    let s1 = fx.create("s1");
    fx.write(0, 0xb2);
    assert!(fx.reads(0, 0xb2));
    if c.file_based() {
        let f = s1
            .file
            .clone()
            .expect("a file-based snapshot names its file");
        assert!(f.is_file(), "{} exists", f.display());
        assert!(
            reads(&f, 0, 0xa1),
            "the snapshot's own file {} holds what was written before it",
            f.display()
        );
        assert!(!reads(&f, 0, 0xb2));
    } else {
        assert_eq!(
            fx.internal_names(),
            vec!["s1"],
            "the internal snapshot is inside the image"
        );
    }
    fx.revert("s1");
    assert!(
        fx.reads(0, 0xa1),
        "after the revert the image shows what was written before the snapshot"
    );
}

/// Revert: the image's path stays the active image and shows the
/// snapshot's state; the snapshot itself is not consumed or changed.
fn revert_keeps_the_path_the_active_image(c: Case) {
    let fx = Fx::new(c);
    fx.write(0, 0x11);
    let s1 = fx.create("s1");
    fx.write(1, 0x22);
    let s2 = fx.create("s2");
    fx.write(2, 0x33);
    let files_before: Vec<(PathBuf, u64)> = [&s1, &s2]
        .iter()
        .filter_map(|s| s.file.clone())
        .map(|f| (f.clone(), hash_file(&f)))
        .collect();

    fx.revert("s1");
    assert!(
        fx.image.is_file(),
        "the image path is a regular file after the revert"
    );
    assert!(
        fx.reads(0, 0x11) && !fx.reads(1, 0x22) && !fx.reads(2, 0x33),
        "reverted to s1's state"
    );
    assert_eq!(fx.current().as_deref(), Some("s1"));
    match c.kind {
        SnapKind::External => {
            let info = qemu_img::info(&fx.image, Format::Qcow2, true)
                .expect("the path is a qcow2 overlay");
            assert_eq!(info.format, "qcow2");
            assert_eq!(
                info.backing.map(|b| canon(&b)),
                Some(canon(s1.file.as_ref().unwrap())),
                "the overlay is backed by s1's file"
            );
        }
        SnapKind::Internal => {
            assert_eq!(qemu_img::detect_format(&fx.image).unwrap(), Format::Qcow2);
            assert_eq!(
                fx.internal_names(),
                vec!["s1", "s2"],
                "a revert keeps every internal snapshot"
            );
        }
        SnapKind::Reflink | SnapKind::Copy => {
            assert_eq!(
                qemu_img::detect_format(&fx.image).unwrap(),
                c.format,
                "the clone keeps the image's format"
            );
            assert_eq!(backing_of(&fx.image), None);
        }
    }

    // Written after the revert, then reverted again: discarded.
    fx.write(3, 0x44);
    fx.revert("s2");
    assert!(fx.reads(0, 0x11) && fx.reads(1, 0x22) && !fx.reads(2, 0x33) && !fx.reads(3, 0x44));
    assert_eq!(fx.current().as_deref(), Some("s2"));
    fx.write(3, 0x55);
    fx.revert("s2");
    assert!(
        !fx.reads(3, 0x55),
        "reverting twice to the same snapshot works and discards what was written in between"
    );
    if c.kind == SnapKind::External {
        assert_eq!(
            backing_of(&fx.image),
            Some(canon(s2.file.as_ref().unwrap()))
        );
    }
    for (f, h) in files_before {
        assert_eq!(
            hash_file(&f),
            h,
            "a revert never changes a snapshot's file ({})",
            f.display()
        );
    }
}

/// current / has_current / names (+ kind filter) / count / lookup /
/// children on the tree s1 -> {s2, s3}.
fn queries(c: Case) {
    let fx = Fx::new(c);
    let e = &fx.engine;
    let img = &fx.image;
    assert_eq!(e.vol_snapshot_current(img).unwrap(), None);
    assert!(!e.vol_has_current_snapshot(img).unwrap());
    assert!(e.vol_snapshot_list_names(img, None).unwrap().is_empty());
    assert_eq!(e.vol_snapshot_num(img, None).unwrap(), 0);
    assert!(matches!(
        e.vol_snapshot_lookup_by_name(img, "s1"),
        Err(EngineError::NoSnapshot { .. })
    ));
    assert!(matches!(
        e.vol_snapshot_children(img, "s1"),
        Err(EngineError::NoSnapshot { .. })
    ));

    let t0 = now();
    fx.create_req(&CreateRequest {
        description: Some("first one".into()),
        ..fx.req("s1")
    });
    assert_eq!(fx.current().as_deref(), Some("s1"));
    assert!(e.vol_has_current_snapshot(img).unwrap());
    fx.create("s2");
    assert_eq!(fx.current().as_deref(), Some("s2"));
    fx.revert("s1");
    assert_eq!(
        fx.current().as_deref(),
        Some("s1"),
        "a revert makes its snapshot current"
    );
    fx.create("s3");
    let t1 = now();

    assert_eq!(
        e.vol_snapshot_current(img)
            .unwrap()
            .map(|s| s.name)
            .as_deref(),
        Some("s3")
    );
    assert!(e.vol_has_current_snapshot(img).unwrap());
    assert_eq!(fx.names(), vec!["s1", "s2", "s3"], "names, oldest first");
    assert_eq!(
        e.vol_snapshot_list_names(img, Some(c.kind)).unwrap(),
        vec!["s1", "s2", "s3"]
    );
    assert!(
        e.vol_snapshot_list_names(img, Some(c.other_family()))
            .unwrap()
            .is_empty(),
        "the kind filter"
    );
    assert_eq!(e.vol_snapshot_num(img, None).unwrap(), 3);
    assert_eq!(e.vol_snapshot_num(img, Some(c.kind)).unwrap(), 3);
    assert_eq!(e.vol_snapshot_num(img, Some(c.other_family())).unwrap(), 0);
    let listed = e.vol_snapshot_list(img, None).unwrap();
    assert_eq!(
        listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s1", "s2", "s3"]
    );

    for (name, parent) in [("s1", None), ("s2", Some("s1")), ("s3", Some("s1"))] {
        let s = fx.snap(name);
        assert_eq!(s.name, name);
        assert_eq!(s.kind, c.kind);
        assert_eq!(s.volume, canon(img));
        assert_eq!(s.parent.as_deref(), parent, "parent of {name}");
        assert!(
            (t0..=t1).contains(&s.creation_time),
            "creation time of {name}: {} not in {t0}..={t1}",
            s.creation_time
        );
        if c.file_based() {
            assert_eq!(
                s.file.as_deref(),
                Some(fx.default_file(name).as_path()),
                "file of {name}"
            );
        } else {
            assert_eq!(s.file, None);
        }
    }
    assert_eq!(fx.snap("s1").description.as_deref(), Some("first one"));
    assert_eq!(fx.snap("s2").description, None);
    assert_eq!(fx.snap("s1").format, c.format);
    assert!(matches!(
        e.vol_snapshot_lookup_by_name(img, "nope"),
        Err(EngineError::NoSnapshot { .. })
    ));

    assert_eq!(
        e.vol_snapshot_children(img, "s1").unwrap(),
        vec!["s2", "s3"]
    );
    assert!(e.vol_snapshot_children(img, "s2").unwrap().is_empty());
    assert!(e.vol_snapshot_children(img, "s3").unwrap().is_empty());

    // A volume is named by its path: another spelling of it is the same volume.
    let other_spelling = fx.work.join(".").join(img.file_name().unwrap());
    assert_eq!(
        e.vol_snapshot_list_names(&other_spelling, None).unwrap(),
        vec!["s1", "s2", "s3"]
    );
    assert_eq!(
        e.vol_snapshot_current(&other_spelling)
            .unwrap()
            .map(|s| s.name)
            .as_deref(),
        Some("s3")
    );
}

/// `vol_snapshot_create_xml`: the document's choices, the flags winning;
/// a dry run and a refused document change nothing.
fn create_xml(c: Case) {
    let fx = Fx::new(c);
    let e = &fx.engine;
    let img = &fx.image;
    let doc = format!(
        "<volsnapshot><name>from-xml</name><description>d1</description><kind>{}</kind></volsnapshot>",
        c.kind
    );
    let flags = VolSnapFlags {
        name: Some("s1".into()),
        ..Default::default()
    };
    let d = e
        .vol_snapshot_create_xml(img, Some(&doc), flags.clone(), true)
        .unwrap();
    assert!(d.dry_run && d.plan.is_none());
    assert_eq!(d.snapshot.name, "s1", "the flags' name wins");
    assert_eq!(e.vol_snapshot_num(img, None).unwrap(), 0, "a dry run");
    let d = e
        .vol_snapshot_create_xml(img, Some(&doc), flags, false)
        .unwrap();
    assert!(!d.dry_run && d.plan.is_some());
    fx.check();
    let s = e.vol_snapshot_lookup_by_name(img, "s1").unwrap();
    assert_eq!(s, d.snapshot);
    assert_eq!(s.kind, c.kind, "the document's kind");
    assert_eq!(
        s.description.as_deref(),
        Some("d1"),
        "the document's description"
    );
    assert!(matches!(
        e.vol_snapshot_lookup_by_name(img, "from-xml"),
        Err(EngineError::NoSnapshot { .. })
    ));
    // No document: the flags alone (and the description the flags give).
    e.vol_snapshot_create_xml(
        img,
        None,
        VolSnapFlags {
            name: Some("s2".into()),
            description: Some("d2".into()),
            kind: Some(c.kind),
            ..Default::default()
        },
        false,
    )
    .unwrap();
    fx.check();
    assert_eq!(fx.snap("s2").description.as_deref(), Some("d2"));
    let err = e
        .vol_snapshot_create_xml(
            img,
            Some("<volsnapshot><colour/></volsnapshot>"),
            VolSnapFlags::default(),
            false,
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Xml(_)), "{err}");
    assert_eq!(fx.names(), ["s1", "s2"]);
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `vol_snapshot_get_xml_desc` round-trips through `xml::parse_volsnapshot`.
fn xml_round_trips(c: Case) {
    let fx = Fx::new(c);
    fx.create_req(&CreateRequest {
        description: Some("a <b> & \"c\"".into()),
        ..fx.req("s1")
    });
    fx.create("s2");
    for name in ["s1", "s2"] {
        let s = fx.snap(name);
        let x = fx
            .engine
            .vol_snapshot_get_xml_desc(&fx.image, name)
            .unwrap();
        let spec = xml::parse_volsnapshot(&x)
            .unwrap_or_else(|e| panic!("dumpxml of {name} does not parse: {e}\n{x}"));
        assert_eq!(spec.name.as_deref(), Some(name), "{x}");
        assert_eq!(spec.description, s.description, "{x}");
        assert_eq!(spec.kind, Some(c.kind), "{x}");
        assert_eq!(spec.file, s.file, "{x}");
        assert!(
            x.contains(&format!("<creationTime>{}</creationTime>", s.creation_time)),
            "{x}"
        );
        assert!(
            x.contains(&format!("<volume>{}</volume>", s.volume.display())),
            "{x}"
        );
    }
    let x1 = fx
        .engine
        .vol_snapshot_get_xml_desc(&fx.image, "s1")
        .unwrap();
    let x2 = fx
        .engine
        .vol_snapshot_get_xml_desc(&fx.image, "s2")
        .unwrap();
    assert!(x1.contains("<current>no</current>") && x2.contains("<current>yes</current>"));
    assert!(
        !x1.contains("<parent>") && x2.contains("<parent>") && x2.contains("<name>s1</name>"),
        "{x2}"
    );
    assert!(matches!(
        fx.engine.vol_snapshot_get_xml_desc(&fx.image, "nope"),
        Err(EngineError::NoSnapshot { .. })
    ));
}

/// Chain s1 <- s2 <- s3 (A before s1, B before s2, C before s3, D after).
fn chain(fx: &Fx) -> [VolSnapshot; 3] {
    fx.write(0, 0xa0);
    let s1 = fx.create("s1");
    fx.write(1, 0xb0);
    let s2 = fx.create("s2");
    fx.write(2, 0xc0);
    let s3 = fx.create("s3");
    fx.write(3, 0xd0);
    [s1, s2, s3]
}

fn image_shows_abcd(fx: &Fx) -> bool {
    fx.reads(0, 0xa0) && fx.reads(1, 0xb0) && fx.reads(2, 0xc0) && fx.reads(3, 0xd0)
}

/// Default delete of the middle of a chain: s3 keeps its data (external:
/// its file is rebased onto s1's file) and is re-parented onto s1; the
/// image keeps its data; s2 is gone from the catalog and the disk.
fn delete_default_reparents_children(c: Case) {
    let fx = Fx::new(c);
    let [s1, s2, s3] = chain(&fx);
    let d = fx.delete("s2", false);
    assert_eq!(d.snapshot.name, "s2");
    assert!(d.deleted.is_empty());
    assert_eq!(fx.names(), vec!["s1", "s3"]);
    assert_eq!(
        fx.snap("s3").parent.as_deref(),
        Some("s1"),
        "the catalog parent of s3 becomes s1"
    );
    assert_eq!(fx.current().as_deref(), Some("s3"));
    assert!(image_shows_abcd(&fx), "the image keeps every byte");
    match c.kind {
        SnapKind::Internal => assert_eq!(fx.internal_names(), vec!["s1", "s3"]),
        _ => {
            assert!(!s2.file.as_ref().unwrap().exists(), "s2's file is removed");
            assert!(s1.file.as_ref().unwrap().is_file() && s3.file.as_ref().unwrap().is_file());
        }
    }
    if c.kind == SnapKind::External {
        let f1 = s1.file.as_ref().unwrap();
        let f3 = s3.file.as_ref().unwrap();
        assert_eq!(
            backing_of(f3),
            Some(canon(f1)),
            "s3's file is rebased onto s1's file"
        );
        assert_eq!(
            backing_of(&fx.image),
            Some(canon(f3)),
            "the image still runs on s3's file"
        );
        assert!(
            reads(f3, 0, 0xa0) && reads(f3, 1, 0xb0) && reads(f3, 2, 0xc0) && !reads(f3, 3, 0xd0),
            "s3's file keeps its data"
        );
    }
    fx.revert("s3");
    assert!(
        fx.reads(0, 0xa0) && fx.reads(1, 0xb0) && fx.reads(2, 0xc0) && !fx.reads(3, 0xd0),
        "s3 still holds its state"
    );
    fx.revert("s1");
    assert!(
        fx.reads(0, 0xa0) && !fx.reads(1, 0xb0) && !fx.reads(2, 0xc0),
        "s1 still holds its state"
    );
}

/// delete --children: the subtree goes (catalog and files), current moves
/// to the parent, the image keeps its data.
fn delete_children_removes_the_subtree(c: Case) {
    let fx = Fx::new(c);
    let [s1, s2, s3] = chain(&fx);
    let d = fx.delete("s2", true);
    assert_eq!(d.snapshot.name, "s2");
    assert_eq!(d.deleted, vec!["s3"]);
    assert_eq!(fx.names(), vec!["s1"]);
    assert_eq!(
        fx.current().as_deref(),
        Some("s1"),
        "current moves to the deleted subtree's parent"
    );
    assert!(image_shows_abcd(&fx), "the image keeps every byte");
    match c.kind {
        SnapKind::Internal => assert_eq!(fx.internal_names(), vec!["s1"]),
        _ => {
            for s in [&s2, &s3] {
                assert!(
                    !s.file.as_ref().unwrap().exists(),
                    "{}'s file is removed",
                    s.name
                );
            }
            assert!(s1.file.as_ref().unwrap().is_file());
        }
    }
    if c.kind == SnapKind::External {
        assert_eq!(
            backing_of(&fx.image),
            Some(canon(s1.file.as_ref().unwrap())),
            "the image is rebased onto s1's file"
        );
    }
    // Only s1's file (if any) and the image remain in the directory.
    // (The ownership claim beside the image is vsnap's too, not a leftover.)
    let mut left: Vec<String> = std::fs::read_dir(&fx.work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !vsnap_engine::testing::is_claim(n))
        .collect();
    left.sort();
    let mut want = vec![format!("disk.{}", c.ext())];
    if c.file_based() {
        want.insert(0, format!("disk.s1.{}", c.ext()));
    }
    want.sort();
    assert_eq!(left, want);
    fx.revert("s1");
    assert!(fx.reads(0, 0xa0) && !fx.reads(1, 0xb0));
}

/// `dry_run` compiles a plan and changes nothing: catalog, journal and
/// directory listing (names, sizes, mtimes, contents) are identical.
fn dry_run_changes_nothing(c: Case) {
    let fx = Fx::new(c);
    fx.write(0, 0x01);
    fx.create("s1");
    fx.write(1, 0x02);
    fx.create("s2");
    fx.write(2, 0x03);
    let before = fx.world();
    let d = fx
        .engine
        .vol_snapshot_create(&fx.req("s3"), true)
        .expect("dry-run create");
    assert!(
        d.dry_run && d.plan.is_none() && d.plan_text.contains("PIVOT"),
        "{d:?}"
    );
    assert_eq!(fx.world(), before, "a dry-run create changed something");
    let d = fx
        .engine
        .vol_snapshot_revert(
            &RevertRequest {
                image: fx.image.clone(),
                name: "s1".into(),
            },
            true,
        )
        .expect("dry-run revert");
    assert!(
        d.dry_run && d.plan.is_none() && d.plan_text.contains("PIVOT"),
        "{d:?}"
    );
    assert_eq!(fx.world(), before, "a dry-run revert changed something");
    for children in [false, true] {
        let d = fx
            .engine
            .vol_snapshot_delete(
                &DeleteRequest {
                    image: fx.image.clone(),
                    name: "s1".into(),
                    children,
                },
                true,
            )
            .expect("dry-run delete");
        assert!(
            d.dry_run && d.plan.is_none() && d.plan_text.contains("PIVOT"),
            "{d:?}"
        );
        assert_eq!(
            fx.world(),
            before,
            "a dry-run delete (children: {children}) changed something"
        );
    }
    fx.check();
    assert!(fx.reads(2, 0x03));
}

/// No name: the creation time in seconds. No file: `<stem>.<name>.<ext>`
/// beside the image.
fn default_name_and_file_naming(c: Case) {
    let fx = Fx::new(c);
    let t0 = now();
    let s = fx.create_req(&CreateRequest {
        image: fx.image.clone(),
        kind: Some(c.kind),
        ..Default::default()
    });
    let t1 = now();
    let n: i64 = s
        .name
        .parse()
        .unwrap_or_else(|_| panic!("default name {:?} is the creation time in seconds", s.name));
    assert!(
        (t0..=t1).contains(&n),
        "default name {n} not in {t0}..={t1}"
    );
    let named = fx.create("two");
    if c.file_based() {
        assert_eq!(s.file, Some(fx.work.join(format!("disk.{n}.{}", c.ext()))));
        assert_eq!(
            named.file,
            Some(fx.work.join(format!("disk.two.{}", c.ext())))
        );
        assert!(named.file.as_ref().unwrap().is_file());
    } else {
        assert_eq!((s.file, named.file), (None, None));
        assert_eq!(fx.internal_names(), vec![s.name.clone(), "two".to_string()]);
    }
}

/// `--file` in another directory of the same filesystem (file-based kinds;
/// refused for internal snapshots, which live inside the image).
fn file_elsewhere_on_the_same_filesystem(c: Case) {
    let fx = Fx::new(c);
    let elsewhere = fx.work.join("history");
    std::fs::create_dir(&elsewhere).unwrap();
    let target = elsewhere.join("first.snapshot");
    fx.write(0, 0x5a);
    let req = CreateRequest {
        file: Some(target.clone()),
        ..fx.req("s1")
    };
    if !c.file_based() {
        let e = fx
            .engine
            .vol_snapshot_create(&req, false)
            .expect_err("--file with an internal snapshot");
        assert!(e.to_string().contains("does not apply to internal"), "{e}");
        assert!(fx.names().is_empty());
        fx.check();
        return;
    }
    let s = fx.create_req(&req);
    assert_eq!(s.file.as_deref(), Some(target.as_path()));
    assert!(target.is_file());
    assert!(
        !fx.default_file("s1").exists(),
        "nothing at the default name"
    );
    assert!(reads(&target, 0, 0x5a));
    fx.write(0, 0x6b);
    fx.create("s2");
    fx.revert("s1");
    assert!(fx.reads(0, 0x5a));
    if c.kind == SnapKind::External {
        assert_eq!(backing_of(&fx.image), Some(canon(&target)));
        fx.delete("s2", false);
    } else {
        fx.delete("s1", false);
        assert!(
            !target.exists(),
            "delete removes the file where --file put it"
        );
    }
}

macro_rules! kind_tests {
    ($($module:ident: $kind:ident, $format:ident, $btrfs:expr;)*) => {$(
        mod $module {
            use super::*;
            const C: Case = Case { kind: SnapKind::$kind, format: Format::$format, btrfs: $btrfs };
            #[test]
            fn create_holds_data_written_before() {
                super::create_holds_data_written_before(C)
            }
            #[test]
            fn revert_keeps_the_path_the_active_image() {
                super::revert_keeps_the_path_the_active_image(C)
            }
            #[test]
            fn current_names_count_lookup_children() {
                super::queries(C)
            }
            #[test]
            fn create_xml() {
                super::create_xml(C)
            }
            #[test]
            fn xml_round_trips() {
                super::xml_round_trips(C)
            }
            #[test]
            fn delete_default_reparents_children() {
                super::delete_default_reparents_children(C)
            }
            #[test]
            fn delete_children_removes_the_subtree() {
                super::delete_children_removes_the_subtree(C)
            }
            #[test]
            fn dry_run_changes_nothing() {
                super::dry_run_changes_nothing(C)
            }
            #[test]
            fn default_name_and_file_naming() {
                super::default_name_and_file_naming(C)
            }
            #[test]
            fn file_elsewhere_on_the_same_filesystem() {
                super::file_elsewhere_on_the_same_filesystem(C)
            }
        }
    )*};
}

kind_tests! {
    internal_qcow2: Internal, Qcow2, false;
    external_qcow2: External, Qcow2, false;
    external_raw: External, Raw, false;
    reflink_qcow2: Reflink, Qcow2, true;
    reflink_raw: Reflink, Raw, true;
    copy_qcow2: Copy, Qcow2, false;
    copy_raw: Copy, Raw, false;
}

// ------------------------------------------------------ across kinds

/// Internal then external on one volume is refused with a message naming
/// both families, and nothing changes.
#[test]
fn families_do_not_mix_internal_then_external() {
    let fx = Fx::new(Case {
        kind: SnapKind::Internal,
        format: Format::Qcow2,
        btrfs: false,
    });
    fx.create("s1");
    let before = fx.world();
    for kind in [SnapKind::External, SnapKind::Copy] {
        let e = fx
            .engine
            .vol_snapshot_create(
                &CreateRequest {
                    kind: Some(kind),
                    ..fx.req("s2")
                },
                false,
            )
            .expect_err("mixing families must be refused");
        let m = e.to_string();
        assert!(
            m.contains("does not mix")
                && m.contains("internal")
                && m.contains(kind.family())
                && m.contains("\"s1\""),
            "{m}"
        );
        assert_eq!(fx.world(), before, "a refused create changed something");
    }
    fx.check();
}

#[test]
fn families_do_not_mix_external_then_internal() {
    let fx = Fx::new(Case {
        kind: SnapKind::External,
        format: Format::Qcow2,
        btrfs: false,
    });
    fx.create("s1");
    let before = fx.world();
    let e = fx
        .engine
        .vol_snapshot_create(
            &CreateRequest {
                kind: Some(SnapKind::Internal),
                ..fx.req("s2")
            },
            false,
        )
        .expect_err("mixing families must be refused");
    let m = e.to_string();
    assert!(
        m.contains("does not mix") && m.contains("external") && m.contains("internal"),
        "{m}"
    );
    assert_eq!(fx.world(), before);
    // Without --kind, the volume's kind is the default: external.
    let s = fx.create_req(&CreateRequest {
        image: fx.image.clone(),
        name: Some("s2".into()),
        ..Default::default()
    });
    assert_eq!(s.kind, SnapKind::External);
}

/// Reflink and copy are one family: they share a volume, and the kind
/// filter tells them apart.
#[test]
fn reflink_and_copy_share_a_volume_and_filter_by_kind() {
    let fx = Fx::new(Case {
        kind: SnapKind::Reflink,
        format: Format::Raw,
        btrfs: true,
    });
    fx.create("r1");
    fx.create_req(&CreateRequest {
        kind: Some(SnapKind::Copy),
        ..fx.req("c1")
    });
    let e = &fx.engine;
    assert_eq!(
        e.vol_snapshot_list_names(&fx.image, Some(SnapKind::Reflink))
            .unwrap(),
        vec!["r1"]
    );
    assert_eq!(
        e.vol_snapshot_list_names(&fx.image, Some(SnapKind::Copy))
            .unwrap(),
        vec!["c1"]
    );
    assert_eq!(e.vol_snapshot_num(&fx.image, None).unwrap(), 2);
    assert_eq!(
        e.vol_snapshot_num(&fx.image, Some(SnapKind::External))
            .unwrap(),
        0
    );
}

/// Without `kind`: internal for qcow2; reflink for raw where the
/// filesystem can, copy where it cannot.
#[test]
fn default_kind_follows_format_and_filesystem() {
    for (case, want) in [
        (
            Case {
                kind: SnapKind::Internal,
                format: Format::Qcow2,
                btrfs: false,
            },
            SnapKind::Internal,
        ),
        (
            Case {
                kind: SnapKind::Copy,
                format: Format::Raw,
                btrfs: false,
            },
            SnapKind::Copy,
        ),
        (
            Case {
                kind: SnapKind::Reflink,
                format: Format::Raw,
                btrfs: true,
            },
            SnapKind::Reflink,
        ),
    ] {
        let fx = Fx::new(case);
        let s = fx.create_req(&CreateRequest {
            image: fx.image.clone(),
            name: Some("s1".into()),
            ..Default::default()
        });
        assert_eq!(s.kind, want, "{case:?}");
    }
}

/// External snapshots hard-link the image: `--file` on another filesystem
/// is refused, naming the reason, and nothing changes.
#[test]
fn external_file_on_another_filesystem_is_refused() {
    let fx = Fx::new(Case {
        kind: SnapKind::External,
        format: Format::Qcow2,
        btrfs: false,
    });
    let other = Btrfs::new();
    let before = fx.world();
    let target = other.mnt.join("s1.qcow2");
    let e = fx
        .engine
        .vol_snapshot_create(
            &CreateRequest {
                file: Some(target.clone()),
                ..fx.req("s1")
            },
            false,
        )
        .expect_err("--file on another filesystem");
    assert!(e.to_string().contains("same filesystem"), "{e}");
    assert!(!target.exists());
    assert_eq!(fx.world(), before);
    drop(fx);
}

/// Reflink where the filesystem cannot: refused at plan time, nothing changes.
#[test]
fn reflink_on_a_filesystem_without_reflinks_is_refused() {
    let fx = Fx::new(Case {
        kind: SnapKind::Reflink,
        format: Format::Raw,
        btrfs: false,
    });
    let before = fx.world();
    let e = fx
        .engine
        .vol_snapshot_create(&fx.req("s1"), false)
        .expect_err("reflink on ext4");
    assert!(
        e.to_string().contains("cannot make reflinks") && e.to_string().contains("--kind copy"),
        "{e}"
    );
    assert_eq!(fx.world(), before);
}

// ------------------------------------------------------ the state directory

#[test]
fn state_dir_is_created_0700() {
    let tmp = tmpdir();
    let dir = tmp.path().join("state");
    let (engine, _) = Engine::open(&dir).expect("Engine::open");
    let mode = std::fs::metadata(&dir).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o700, "state directory mode {mode:o}");
    drop(engine);
}

#[test]
fn second_open_of_a_state_dir_names_the_holder() {
    let tmp = tmpdir();
    let dir = tmp.path().join("state");
    let (first, _) = Engine::open(&dir).expect("first Engine::open");
    let start = std::time::Instant::now();
    let e = match Engine::open(&dir) {
        Ok(_) => panic!("a second Engine::open of a held state directory succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "the second open waited for the lock"
    );
    assert!(
        e.contains(&format!("locked by process {}", std::process::id())),
        "{e}"
    );
    drop(first);
    Engine::open(&dir).expect("the lock is released with the first engine");
}

/// A plan whose every step is `Done` but which has no `Finished` (a crash
/// after the last `Done` of a journal written one record per flush) is
/// finished by recovery, and a second recovery finds nothing to do.
#[test]
fn recovery_finishes_a_plan_with_every_step_done() {
    use vsnap_journal::{codec, Journal, Outcome, Record};
    let d = tmpdir();
    let state = d.path().join("state");
    let plan = vsnap_engine::Plan {
        op: "test.catalog-only".into(),
        summary: "every step done, not finished".into(),
        steps: vec![vsnap_steps::Step::Catalog],
        pivot: 0,
        catalog: vec![],
    };
    let id = {
        let j = Journal::open(&state).unwrap();
        let id = j.begin(plan.header(), codec::encode(&plan)).unwrap();
        j.append(id, Record::Started(0)).unwrap();
        j.commit_pivot(id, 0, &[]).unwrap();
        id
    };
    let (engine, reports) = Engine::open(&state).unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(
        reports[0].outcome,
        vsnap_engine::PlanOutcome::Committed,
        "{reports:?}"
    );
    let (stored, _) = engine.plan(id.0).unwrap();
    assert_eq!(stored.outcome(), Some(&Outcome::Committed));
    assert_eq!(
        stored.records,
        vec![
            Record::Started(0),
            Record::Done(0),
            Record::Finished(Outcome::Committed)
        ]
    );
    drop(engine);
    let (_engine, reports) = Engine::open(&state).unwrap();
    assert!(reports.is_empty(), "{reports:?}");
}
